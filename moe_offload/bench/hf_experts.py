"""HF Qwen3-MoE-like model: our experts (and offload) vs transformers' ``grouped_mm``.

Run ``python -m moe_offload.bench.hf_experts`` on a GPU (defaults: hidden 2048, 32/4
heads of 128, 16 experts top-4, expert ffn 1024, 8 layers, 2 x 4096 tokens, vocab
32768, bf16, SDPA, router aux loss in the loss), or ``--tiny`` for a seconds-long CPU
run that only checks the plumbing.  Needs ``transformers`` (``pip install
'moe_offload[hf]'``); random weights from a config, nothing is downloaded.

One model, so every variant runs the same weights.  A *step* is forward + backward of
the causal-LM loss (no optimizer).  Step time: median over ``--steps`` steps after
``--warmup``, each timed with CUDA events (``perf_counter`` on the CPU).  Activation
memory: ``torch.cuda.memory_allocated`` after the forward minus before it, with the
parameter gradients already allocated (so it is what the forward keeps for backward,
plus the logits); not measured on the CPU.  Printed as a markdown table with ratios
against the first variant.

Variants (``--variants``, comma separated): ``grouped_mm`` / ``moe_offload`` (the
experts implementation), optionally ``+ckpt`` (HF ``gradient_checkpointing_enable()``),
``+offload`` (:func:`moe_offload.integrations.transformers.offload`, all decoder layers
but the last) and ``+fp8`` (``recipe="fp8"`` for our experts).
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import List, Optional, Sequence

import torch

__all__ = ["main", "build_model", "run_variant", "DEFAULT_VARIANTS"]

DEFAULT_VARIANTS = ("grouped_mm,moe_offload,grouped_mm+ckpt,moe_offload+ckpt,"
                    "moe_offload+offload,moe_offload+ckpt+offload")
MiB = 1 << 20


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moe_offload.bench.hf_experts",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny fp32 model (CPU smoke run)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--ffn", type=int, default=1024, help="expert ffn (moe_intermediate_size)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--variants", default=DEFAULT_VARIANTS)
    return p


def _tiny(args) -> None:
    args.hidden, args.heads, args.kv_heads, args.head_dim = 64, 4, 2, 16
    args.experts, args.top_k, args.ffn, args.layers, args.vocab = 4, 2, 32, 2, 128
    args.batch, args.seq, args.steps, args.warmup, args.dtype = 2, 32, 2, 1, "float32"


def build_model(args, device):
    """A Qwen3-MoE causal LM from a config (random weights), in ``args.dtype`` on ``device``."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig
    import moe_offload.integrations.transformers  # noqa: F401  (registers "moe_offload")
    cfg = Qwen3MoeConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=4 * args.hidden, moe_intermediate_size=args.ffn,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
                         num_experts=args.experts, num_experts_per_tok=args.top_k,
                         norm_topk_prob=True, output_router_logits=True,
                         router_aux_loss_coef=1e-3, max_position_embeddings=args.seq,
                         decoder_sparse_step=1, mlp_only_layers=[])
    torch.manual_seed(0)
    with torch.device(device):        # initialise on the device (fast for 1B+ parameters)
        model = AutoModelForCausalLM.from_config(cfg, experts_implementation="grouped_mm",
                                                 attn_implementation="sdpa",
                                                 dtype=getattr(torch, args.dtype))
    return model.to(device).train()


def _configure(model, variant: str):
    """Apply ``variant``; returns the offload handle or None."""
    from moe_offload.integrations.transformers import offload, set_recipe
    parts = variant.split("+")
    impl, opts = parts[0], set(parts[1:])
    unknown = opts - {"ckpt", "offload", "fp8"}
    if impl not in ("grouped_mm", "moe_offload", "eager") or unknown:
        raise ValueError(f"unknown variant {variant!r}")
    model.set_experts_implementation(impl)
    set_recipe(model, "fp8" if "fp8" in opts else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if "ckpt" in opts:
            model.gradient_checkpointing_enable()
        else:
            model.gradient_checkpointing_disable()
    return offload(model) if "offload" in opts else None


def run_variant(model, ids, variant: str, steps: int, warmup: int) -> dict:
    """Median step seconds and activation bytes (None on the CPU) of one variant."""
    cuda = ids.is_cuda
    handle = _configure(model, variant)
    try:
        def fwd():
            return model(input_ids=ids, labels=ids, output_router_logits=True, use_cache=False).loss

        for _ in range(max(warmup, 1)):     # also allocates the parameter gradients
            fwd().backward()
        times, act = [], None
        for _ in range(steps):
            if cuda:
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            else:
                t0 = time.perf_counter()
            loss = fwd()
            if cuda:
                act = torch.cuda.memory_allocated() - before
            loss.backward()
            del loss
            if cuda:
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=False)
        return {"variant": variant, "seconds": statistics.median(times), "act_bytes": act}
    finally:
        if handle is not None:
            handle.remove()


def format_table(rows: List[dict], title: str) -> str:
    """Markdown table: step ms, activation MiB and both ratios against the first row."""
    base = rows[0]
    lines = [title, "", "| variant | step ms | × time | act MiB | × act |", "|---|---|---|---|---|"]
    for r in rows:
        ms = 1e3 * r["seconds"]
        t_ratio = r["seconds"] / base["seconds"]
        if r["act_bytes"] is None or not base["act_bytes"]:
            act, a_ratio = "n/a", "n/a"
        else:
            act, a_ratio = f"{r['act_bytes'] / MiB:.0f}", f"{r['act_bytes'] / base['act_bytes']:.2f}"
        lines.append(f"| {r['variant']} | {ms:.1f} | {t_ratio:.2f} | {act} | {a_ratio} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> str:
    """Run the benchmark; prints and returns the markdown table."""
    args = _parser().parse_args(argv)
    if args.tiny:
        _tiny(args)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    model = build_model(args, device)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
    rows = [run_variant(model, ids, v.strip(), args.steps, args.warmup)
            for v in args.variants.split(",") if v.strip()]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    title = (f"Qwen3-MoE-like, hidden {args.hidden}, {args.experts} experts top-{args.top_k}, "
             f"ffn {args.ffn}, {args.layers} layers, {args.batch}x{args.seq} tokens, "
             f"{args.dtype}, {where}, torch {torch.__version__}: median of {args.steps} steps")
    table = format_table(rows, title)
    print(table)
    return table


if __name__ == "__main__":
    main()
