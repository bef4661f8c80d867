"""The ``"moe_offload"`` experts implementation for Hugging Face transformers (>= 5.0).

transformers 5.x routes every experts class decorated with ``use_experts_implementation``
through ``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS``, keyed by
``config._experts_implementation``.  Importing this module registers
:func:`moe_offload_experts_forward` there under the name ``"moe_offload"``, so::

    model = AutoModelForCausalLM.from_config(cfg, experts_implementation="moe_offload")
    model.set_experts_implementation("moe_offload")          # or switch later
    use_moe_offload_experts(model, recipe="fp8")             # or: one call, with a recipe

Shape legend: ``T`` tokens, ``H`` hidden, ``F`` expert ffn, ``E`` experts, ``k`` top-k,
``S = T*k`` token copies.

What runs: HF's router is untouched (its ``top_k_index``/``top_k_weights`` come in, and
its load-balancing loss is computed from its own router logits as before).  The
``S`` copies are sorted by expert on the device (:mod:`moe_offload.ops.routing`), our
fused grouped MLP autograd function runs on HF's own parameters (``gate_up_proj``
``(E, 2F, H)``, gate first, *is* our ``fc1`` weight; ``down_proj`` ``(E, H, F)`` our
``fc2`` weight: no copy, ``state_dict`` keys unchanged), and the ``k`` outputs of each
token are summed back deterministically (no ``index_add_``).  No host sync.  What the
MLP saves for backward goes through ``start_offload``/``mark_not_offload`` like our own
layers (weights are marked never-offload; ``x`` and the fc1 output are marked ready
right where they are produced).

Order of operations (the one numerical difference from HF): HF computes
``down_proj(act(gate) * up)``, rounds it to the model dtype, then multiplies by the
router weight ``p`` and sums the ``k`` copies.  We multiply ``act(gate) * up * p`` in
fp32 inside the activation kernel, round once, and then run ``down_proj`` (so fc2 sees
``p``-scaled inputs).  The two are equal in exact arithmetic; in fp32 they agree to
rounding (the tests see <= 1e-6 relative on logits, loss and every gradient); in bf16
the two differ by about one bf16 rounding of each expert output (relative ~2^-8 per
copy): we round ``act * p`` once where HF rounds ``act``, then ``down_proj``'s output,
then its product with ``p``.  The CUDA test bounds our bf16 error against an fp32 run by
twice HF ``grouped_mm``'s own bf16 error.  The router-weight gradient is formed as a row sum over ``F``
(``sum(d_a * act)``) instead of over ``H``; equal in exact arithmetic.  With expert
biases (``has_bias``) HF scales the bias by ``p`` as well, so there the kernel runs
without ``p`` and the weighted combine applies it after ``down_proj`` exactly as HF does.

Supported experts classes: concatenated gate/up (``is_concatenated=True``, the
default), with the default gate (``act_fn(gate) * up``) where ``act_fn`` is SiLU
(``swiglu``) or exact-erf GELU (``geglu``); or without gate (``has_gate=False``) with
SiLU, exact GELU or ReLU; transposed weights and biases are supported.  Rejected with a
``ValueError`` naming the class: interleaved gate/up (GPT-OSS), a custom
``_apply_gate`` (GPT-OSS, DeepSeek-V4 and others with clamped or scaled gates), other
activations (tanh-GELU, ReLU², ...), ``has_post_expert_norm``, and expert parallelism.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ...ops.grouped_mlp import grouped_mlp
from ...ops.routing import permute, permute_probs, sort_by_expert, unpermute

__all__ = ["IMPLEMENTATION", "ExpertsSpec", "register", "inspect_experts",
           "moe_offload_experts_forward", "use_moe_offload_experts", "set_recipe",
           "RECIPES"]

IMPLEMENTATION = "moe_offload"
RECIPES = (None, "fp8", "mxfp8", "nvfp4")
RECOMPUTE_MODES = ("activation", "fc1")      # GroupedMLP's recompute modes

# Attributes we set on HF experts modules (plain Python attributes: not in state_dict).
_RECIPE_ATTR = "moe_offload_recipe"
RECOMPUTE_ATTR = "moe_offload_recompute"   # the recompute switch on an HF experts module
_SPEC_ATTR = "_moe_offload_spec"


def _hf_moe():
    try:
        from transformers.integrations import moe
    except ImportError as e:   # pragma: no cover - optional dependency
        raise ImportError("moe_offload.integrations.transformers needs transformers>=5.0 "
                          "(pip install 'moe_offload[hf]')") from e
    return moe


@dataclass(frozen=True)
class ExpertsSpec:
    """How an HF experts module maps onto our grouped MLP."""

    activation: str          # our activation name ("swiglu", "geglu", "silu", ...)
    transposed: bool         # weights stored (E, in, out)
    has_bias: bool


def _act_name(act_fn: nn.Module) -> Optional[str]:
    """Our name for HF's elementwise activation module, or None if we have no exact match."""
    from transformers import activations as hf_act
    if isinstance(act_fn, (nn.SiLU, getattr(hf_act, "SiLUActivation", nn.SiLU))):
        return "silu"
    if type(act_fn) is hf_act.GELUActivation:          # exact erf gelu (python or C)
        return "gelu"
    if type(act_fn) is nn.GELU and act_fn.approximate == "none":
        return "gelu"
    if type(act_fn) is nn.ReLU:
        return "relu"
    return None


def inspect_experts(module: nn.Module) -> ExpertsSpec:
    """Check that ``module`` (an HF experts module) can run on our grouped MLP.

    Returns its :class:`ExpertsSpec`; raises ``ValueError`` naming the class otherwise
    (the message says which property is unsupported).
    """
    moe = _hf_moe()
    name = type(module).__name__
    if not hasattr(module, "has_gate") or not hasattr(module, "is_concatenated"):
        raise ValueError(f"moe_offload: {name} is not an experts class decorated with "
                         "transformers' use_experts_implementation")
    if getattr(module, "_is_expert_parallel", False):
        raise ValueError(f"moe_offload: {name} runs with expert parallelism, which the "
                         "'moe_offload' experts implementation does not support")
    if getattr(module, "has_post_expert_norm", False):
        raise ValueError(f"moe_offload: {name} has a post-expert norm (has_post_expert_norm),"
                         " which the 'moe_offload' experts implementation does not support")
    if module.has_gate and not module.is_concatenated:
        raise ValueError(f"moe_offload: {name} stores gate/up interleaved "
                         "(is_concatenated=False); only the concatenated [gate; up] layout "
                         "is supported")
    if module.has_gate and type(module)._apply_gate is not getattr(moe, "_default_apply_gate", None):
        raise ValueError(f"moe_offload: {name} overrides _apply_gate (a custom gating "
                         "function, e.g. clamped SwiGLU); only act_fn(gate) * up is supported")
    act = _act_name(getattr(module, "act_fn", None))
    if module.has_gate:
        act = {"silu": "swiglu", "gelu": "geglu"}.get(act)
    if act is None:
        raise ValueError(f"moe_offload: {name} uses activation "
                         f"{type(getattr(module, 'act_fn', None)).__name__}, which has no exact "
                         "counterpart (supported: SiLU and exact GELU gates; SiLU, exact "
                         "GELU, ReLU without gate)")
    return ExpertsSpec(act, bool(module.is_transposed), bool(module.has_bias))


def _spec(module: nn.Module) -> ExpertsSpec:
    spec = module.__dict__.get(_SPEC_ATTR)
    if spec is None:
        spec = inspect_experts(module)
        module.__dict__[_SPEC_ATTR] = spec
    return spec


def _expert_mlp(x_SH, offs_E, w1_EXH, b1_EX, w2_EHF, b2_EH, probs_S, activation: str,
                recipe: Optional[str], recompute: str) -> torch.Tensor:
    """The one place that calls our fused expert MLP (bf16/fp32 or a quantized recipe).

    ``offs_E`` are int32 end offsets covering all ``S`` rows (every copy has an expert).
    """
    return grouped_mlp(x_SH, offs_E, w1_EXH, b1_EX, w2_EHF, b2_EH, probs_S, activation,
                       recompute=recompute, covered=True, recipe=recipe)


def moe_offload_experts_forward(self: nn.Module, hidden_states: torch.Tensor,
                                top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """Experts forward registered as ``"moe_offload"`` (signature of HF's experts forward).

    ``hidden_states`` ``(T, H)``, ``top_k_index`` ``(T, k)`` expert ids, ``top_k_weights``
    ``(T, k)`` router weights -> ``(T, H)`` in ``hidden_states``' dtype.  See the module
    docstring for the order of operations.
    """
    spec = _spec(self)
    recipe = getattr(self, _RECIPE_ATTR, None)
    recompute = getattr(self, RECOMPUTE_ATTR, "activation")
    w1 = self.gate_up_proj if self.has_gate else self.up_proj
    b1 = (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias) if spec.has_bias else None
    w2, b2 = self.down_proj, (self.down_proj_bias if spec.has_bias else None)
    if spec.transposed:        # stored (E, in, out): our layout is (E, out, in); a view
        w1, w2 = w1.transpose(1, 2), w2.transpose(1, 2)
    E, k = w1.shape[0], top_k_index.shape[-1]
    x_TH = hidden_states.to(w1.dtype)
    order_S, offs_E = sort_by_expert(top_k_index, E)
    xs_SH = permute(x_TH, order_S, k)
    if spec.has_bias:          # HF scales the bias by p too: apply p after down_proj
        ys_SH = _expert_mlp(xs_SH, offs_E, w1, b1, w2, b2, None, spec.activation, recipe, recompute)
        out_TH = unpermute(ys_SH, order_S, k, probs_Tk=top_k_weights)
    else:
        ps_S = permute_probs(top_k_weights, order_S)
        ys_SH = _expert_mlp(xs_SH, offs_E, w1, b1, w2, b2, ps_S, spec.activation, recipe, recompute)
        out_TH = unpermute(ys_SH, order_S, k)
    return out_TH.to(hidden_states.dtype)


def register() -> None:
    """Register ``"moe_offload"`` in transformers' ``ExpertsInterface`` (idempotent;
    done when this module is imported)."""
    _hf_moe().ExpertsInterface.register(IMPLEMENTATION, moe_offload_experts_forward)


def runs_moe_offload(module: nn.Module) -> bool:
    """True for an HF experts module whose forward dispatches to ``"moe_offload"`` (its
    ``RECOMPUTE_ATTR`` attribute then selects what backward recomputes)."""
    cfg = getattr(module, "config", None)
    return (hasattr(module, "has_gate") and hasattr(module, "down_proj")
            and getattr(cfg, "_experts_implementation", None) == IMPLEMENTATION)


def _experts_modules(model: nn.Module):
    return [m for m in model.modules() if hasattr(m, "has_gate") and hasattr(m, "is_concatenated")
            and hasattr(m, "down_proj")]


def set_recipe(model: nn.Module, recipe: Optional[str] = None, recompute: str = "activation") -> int:
    """Select the compute recipe of every experts module of ``model`` under ``"moe_offload"``.

    ``recipe``: ``None`` (the parameters' dtype), ``"fp8"`` (FP8 GEMMs on sm90+, emulated
    elsewhere), ``"mxfp8"`` or ``"nvfp4"`` (emulated).  ``recompute``: what the
    unquantized MLP recomputes in backward (``"activation"`` or ``"fc1"``; see
    :class:`moe_offload.GroupedMLP`).  Returns the number of experts modules set.
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")
    mods = _experts_modules(model)
    for m in mods:
        setattr(m, _RECIPE_ATTR, recipe)
        setattr(m, RECOMPUTE_ATTR, recompute)
    return len(mods)


def use_moe_offload_experts(model: nn.Module, recipe: Optional[str] = None,
                            recompute: str = "activation") -> nn.Module:
    """Run every experts module of an HF ``model`` on our fused grouped MLP; returns ``model``.

    Checks each experts module first (``ValueError`` naming the class if one is not
    supported; nothing is changed then), sets ``recipe``/``recompute`` (see
    :func:`set_recipe`) and calls ``model.set_experts_implementation("moe_offload")``.
    ``model.set_experts_implementation("grouped_mm")`` switches back.
    """
    register()
    mods = _experts_modules(model)
    if not mods:
        raise ValueError(f"moe_offload: {type(model).__name__} has no experts module decorated "
                         "with transformers' use_experts_implementation")
    for m in mods:
        _spec(m)
    set_recipe(model, recipe, recompute)
    model.set_experts_implementation(IMPLEMENTATION)
    return model


register()
