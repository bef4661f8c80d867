"""What the benchmark rows run on: one :class:`Workload` per model.

A workload is a model, its layer list, a step (``step() -> loss``; the backward is
``loss.backward()``) and the tensors whose gradients a row compares.  Every strategy of
:mod:`~moe_offload.bench.strategies` is installed on a workload and every row is measured
the same way (:mod:`~moe_offload.bench.run`), whatever the model:

- **synthetic stacks** (``--model mlp`` / ``moe``): ``L`` expert layers run as
  ``x = layer(x)`` (layer classes in :mod:`~moe_offload.bench.models`).  ``fused``: our
  ``GroupedMLP``; its variants ``fused/fc1`` (``recompute="fc1"``) and ``fused/<recipe>``
  share the very same ``Parameter`` objects.  ``unfused``: the peers' composition of
  ``torch._grouped_mm`` with the same weights.  ``moe``: full ``MoE`` blocks.  The step is
  ``loss_with_grad(stack(x), dy)`` (its backward is ``y.backward(dy)``); the leaf input
  ``x`` is the first gradient compared.
- **the Qwen3-MoE slice** (``--model slice``, the CPU default): a Hugging Face
  ``Qwen3MoeForCausalLM`` built from a config (random weights, nothing downloaded), one
  sequence of ``--seq`` tokens, the step ``model(ids, labels=ids).loss`` with the router
  aux loss in it.  On a GPU: hidden 2048, 32/4 heads of 128, 128 experts top-8, expert ffn
  768, 8 layers, vocab 32,768, bf16, SDPA; on the CPU a tiny version.

The planner's figures of a workload are measured once, on first use (:meth:`Workload.figures`),
and again only when the model changed for good (:meth:`Workload.use_our_experts`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from .config import BenchConfig
from .measure import loss_with_grad
from .models import FusedLayer, MoELayer, UnfusedSwiGLU, make_split_sizes

__all__ = ["Workload", "QWEN3_SLICE", "QWEN3_TINY", "build_qwen3", "stack_workloads",
           "qwen3_workload", "model_workload", "build_workloads"]

# hidden, heads, kv heads, head dim, experts, top-k, expert ffn, layers, vocab, dense ffn
QWEN3_SLICE = dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                   num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                   num_hidden_layers=8, vocab_size=32768, intermediate_size=6144)
QWEN3_TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                  num_hidden_layers=4, vocab_size=256, intermediate_size=128)


@dataclass
class Workload:
    """One model the rows run on (see the module docstring).

    ``kind``: ``"stack"`` or ``"hf"`` (a Hugging Face model: its own checkpointing switch
    and experts).  ``params``: the tensors whose ``.grad`` a row compares and resets (a
    stack's input first).  ``output_bytes``: bytes the forward must leave allocated (the
    floor of a row's activation figure).  ``options``: the planner's recompute options
    (``None``: all that apply; a stack variant only offloads).  ``measure``: the keyword
    arguments of :func:`~moe_offload.plan.measure_model`.  ``state``: changes when a row
    changes the model for good; gradient references are kept per state.  ``experts_error``:
    why the switch to our experts failed (empty: it did not, or was not tried)."""
    name: str
    kind: str
    model: nn.Module
    layers: nn.ModuleList
    step: Callable[[], torch.Tensor]
    params: list
    cuda: bool
    min_offload_bytes: int
    output_bytes: int = 0
    options: Optional[tuple] = None
    measure: dict = field(default_factory=dict)
    state: str = ""
    experts_error: str = ""
    _figures: dict = field(default_factory=dict, repr=False)

    @property
    def base(self) -> str:
        """The stack this one is a variant of (``fused`` for ``fused/fc1``); ratios use its
        ``none`` row."""
        return self.name.split("/")[0]

    def figures(self) -> tuple:
        """``measure_model``'s ``(layers, ModelFigures)`` of this workload, measured once per
        :attr:`state` (the model's gradients, RNG and modes are restored by the planner)."""
        if self.state not in self._figures:
            from ..plan import measure_model
            try:
                self._figures[self.state] = measure_model(
                    self.model, self.step, self.layers, min_offload_bytes=self.min_offload_bytes,
                    options=self.options, emulate=not self.cuda, **self.measure)
            finally:
                self.clear_grads()
        return self._figures[self.state]

    def measured_figures(self) -> dict:
        """``{state: (layers, ModelFigures)}`` measured so far."""
        return dict(self._figures)

    def clear_grads(self) -> None:
        """Every compared tensor's ``.grad`` to ``None``."""
        for p in self.params:
            p.grad = None

    def use_our_experts(self) -> bool:
        """Run a Hugging Face model's experts on our fused grouped MLP from now on (the
        plans' rows do; the peers' rows ran before, on Hugging Face's).  True when it
        switched (or had switched); False when the integration is missing or the model has
        no supported experts (:attr:`experts_error` says why; the plans then run on Hugging
        Face's experts)."""
        if self.state == "ours_experts":
            return True
        if self.kind != "hf" or self.experts_error:
            return False
        try:
            from ..integrations.transformers import use_moe_offload_experts
            use_moe_offload_experts(self.model)
        except Exception as e:   # noqa: BLE001 - the plans then run on HF's experts, and say why
            self.experts_error = f"{type(e).__name__}: {e}"[:300]
            return False
        self.state = "ours_experts"
        return True


# ------------------------------------------------------------------ synthetic stacks
def _distinct(params) -> list:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _share_parameters(dst: nn.Module, src: nn.Module) -> None:
    """Make ``dst`` use ``src``'s very Parameter objects (same names)."""
    for name, p in src.named_parameters(recurse=False):
        setattr(dst, name, p)


def _stack(name: str, layers: nn.ModuleList, x: torch.Tensor, dy: torch.Tensor, cfg: BenchConfig,
           bandwidth: tuple, variant: bool) -> Workload:
    def step():
        y = x
        for layer in layers:
            y = layer(y)
        return loss_with_grad(y, dy)
    itemsize = x.element_size()
    # The engine's 256 KiB threshold, lowered to an eighth of x for small problems so
    # that the tiny CPU run moves real bytes.
    threshold = min(256 * 1024, x.numel() * itemsize // 8)
    return Workload(name, "stack", layers, layers, step, [x] + _distinct(layers.parameters()),
                    cfg.is_cuda, threshold, output_bytes=x.numel() * itemsize,
                    options=("none",) if variant else None,
                    measure=dict(iters=max(1, cfg.iters), warmup=cfg.warmup, bandwidth=bandwidth))


def stack_workloads(cfg: BenchConfig, bandwidth: tuple) -> dict:
    """The synthetic stacks ``cfg`` needs, keyed by name (weights seeded by ``cfg.seed``;
    ``bandwidth``: the measured ``(d2h_Bps, h2d_Bps)`` the planner's figures use)."""
    from ..ops.grouped_mlp import GroupedMLP  # late: keeps `--help` light

    device, dtype = torch.device(cfg.device), cfg.torch_dtype
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    x = torch.randn(cfg.tokens, cfg.hidden, generator=gen)
    dy = torch.randn(cfg.tokens, cfg.hidden, generator=gen).to(device=device, dtype=dtype)
    x = x.to(device=device, dtype=dtype).requires_grad_(True)
    torch.manual_seed(cfg.seed)
    recipe = None if cfg.recipe == "none" else cfg.recipe
    stacks = {}

    def add(name, layers, variant=False):
        stacks[name] = _stack(name, nn.ModuleList(layers), x, dy, cfg, bandwidth, variant)

    if cfg.model == "moe":
        from ..ops.moe import MoE
        add("moe", [MoELayer(MoE(cfg.hidden, cfg.ffn, cfg.experts, cfg.top_k, device=device, dtype=dtype))
                    for _ in range(cfg.layers)])
        return stacks
    split_sizes_E = make_split_sizes(cfg.tokens, cfg.experts, cfg.splits, cfg.seed, device)
    offs_G = torch.cumsum(split_sizes_E, 0).to(torch.int32)  # on the device: no sync
    base = [GroupedMLP(cfg.experts, cfg.hidden, cfg.ffn, device=device, dtype=dtype)
            for _ in range(cfg.layers)]
    if cfg.stack in ("fused", "both"):
        add("fused", [FusedLayer(m, offs_G) for m in base])
        variants = [("fused/fc1", dict(recompute="fc1"))]
        if recipe is not None:
            variants.append((f"fused/{recipe}", dict(recipe=recipe)))
        for name, kw in variants:
            layers = []
            for m in base:
                v = GroupedMLP(cfg.experts, cfg.hidden, cfg.ffn, device="meta", dtype=dtype, **kw)
                _share_parameters(v, m)
                layers.append(FusedLayer(v, offs_G))
            add(name, layers, variant=True)
    if cfg.stack in ("unfused", "both"):
        add("unfused", [UnfusedSwiGLU(m.fc1_weight.detach().transpose(1, 2).contiguous(),
                                      m.fc2_weight.detach().transpose(1, 2).contiguous(), offs_G)
                        for m in base])
    return stacks


# ------------------------------------------------------------------ Hugging Face models
def build_qwen3(dims: dict, seq: int, device: str, dtype: torch.dtype, seed: int,
                layers: Optional[int] = None):
    """``(model, ids)``: Qwen3-MoE from a config (SDPA, grouped_mm experts, aux loss on),
    random weights seeded by ``seed``, in train mode; ``ids`` ``(1, seq)``."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    kw = dict(dims)
    if layers is not None:
        kw["num_hidden_layers"] = layers
    cfg = Qwen3MoeConfig(**kw, output_router_logits=True, router_aux_loss_coef=0.001,
                         max_position_embeddings=max(seq, 4096), use_cache=False)
    cfg._attn_implementation = "sdpa"
    try:
        cfg._experts_implementation = "grouped_mm"     # HF's batched grouped GEMM path
    except Exception:   # a transformers without that switch keeps its default
        pass
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen3MoeForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.to(dtype).train()
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=gen).to(device)
    return model, ids


def qwen3_workload(cfg: BenchConfig, bandwidth: tuple) -> Workload:
    """The Qwen3-MoE slice (tiny on the CPU) on ``--seq`` tokens."""
    cuda = cfg.is_cuda
    model, ids = build_qwen3(QWEN3_SLICE if cuda else QWEN3_TINY, cfg.seq, cfg.device,
                             cfg.torch_dtype, cfg.seed, layers=cfg.layers_explicit)
    return Workload("qwen3", "hf", model, model.model.layers,
                    lambda: model(input_ids=ids, labels=ids).loss,
                    [p for p in model.parameters() if p.requires_grad], cuda,
                    256 * 1024 if cuda else 1024,
                    measure=dict(iters=max(1, cfg.iters // 2), warmup=min(1, cfg.warmup),
                                 bandwidth=bandwidth))


def model_workload(model: nn.Module, layers: nn.ModuleList, cuda: bool) -> Workload:
    """A Hugging Face model as a workload whose steps its caller runs (the full-depth run
    installs the registry's strategies on it and times its own steps)."""
    def no_step():
        raise RuntimeError("this workload's steps are run by its caller")
    return Workload("full", "hf", model, layers, no_step, [], cuda, 256 * 1024)


def build_workloads(cfg: BenchConfig, bandwidth: tuple) -> dict:
    """``{name: Workload}`` of ``cfg.model`` (``qwen3``: the slice; else the stacks)."""
    if cfg.model == "qwen3":
        return {"qwen3": qwen3_workload(cfg, bandwidth)}
    return stack_workloads(cfg, bandwidth)
