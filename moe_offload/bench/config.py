"""Benchmark configuration: presets, the command line, and validation.

A :class:`BenchConfig` is everything one ``python -m moe_offload bench`` run needs.
:func:`build_parser` defines the flags; :func:`config_from_args` turns parsed flags
into a config and reports bad values through ``parser.error`` (usage message, exit
code 2, naming the bad value).

Shape legend: ``T`` tokens routed to experts, ``H`` hidden, ``F`` ffn hidden, ``E``
experts, ``L`` layers.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

__all__ = ["Preset", "PRESETS", "DTYPES", "RECIPE_CHOICES", "STACK_CHOICES", "MODEL_CHOICES",
           "BenchConfig", "build_parser", "config_from_args"]


@dataclass(frozen=True)
class Preset:
    """Problem size of one preset: ``T, H, F, E, L`` and the dtype name."""
    tokens: int
    hidden: int
    ffn: int
    experts: int
    layers: int
    dtype: str


PRESETS = {
    # CPU smoke size: the whole run takes seconds.
    "tiny": Preset(tokens=256, hidden=64, ffn=128, experts=4, layers=4, dtype="fp32"),
    "small": Preset(tokens=4096, hidden=1024, ffn=512, experts=8, layers=4, dtype="bf16"),
    # The bandwidth-bound shape of ANCHORS.md (3.25 GiB of saved activations unfused).
    "medium": Preset(tokens=16384, hidden=4096, ffn=2048, experts=8, layers=8, dtype="bf16"),
    "large": Preset(tokens=32768, hidden=4096, ffn=2048, experts=16, layers=8, dtype="bf16"),
}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
RECIPE_CHOICES = ("none", "fp8", "mxfp8", "nvfp4")
STACK_CHOICES = ("fused", "unfused", "both")
MODEL_CHOICES = ("full", "slice", "qwen3", "mlp", "moe")   # qwen3: the slice's former name
# Flags that only make sense for the synthetic stacks: giving one selects --model mlp
# when --model is not given.
_SYNTHETIC_FLAGS = ("preset", "tokens", "hidden", "ffn", "experts", "recipe", "stack")
SPLIT_CHOICES = ("uniform", "random")


@dataclass
class BenchConfig:
    """One benchmark run.  ``strategies=None`` means every strategy that applies."""
    tokens: int
    hidden: int
    ffn: int
    experts: int
    layers: int
    dtype: str
    device: str
    preset: Optional[str] = None
    recipe: str = "fp8"
    recipe_explicit: bool = False
    stack: str = "both"
    model: str = "mlp"
    splits: str = "uniform"
    top_k: int = 2
    strategies: Optional[list] = None
    iters: int = 5
    warmup: int = 2
    json_path: Optional[str] = None
    plot_path: Optional[str] = None
    seed: int = 0
    progress: bool = True
    seq: int = 8192
    layers_explicit: Optional[int] = None
    unit: int = 4096
    cap: int = 98304
    cap_explicit: bool = False
    time_budget: float = 540.0
    device_memory_mib: int = 64

    @property
    def torch_dtype(self) -> torch.dtype:
        """The ``torch.dtype`` of :attr:`dtype`."""
        return DTYPES[self.dtype]

    @property
    def is_cuda(self) -> bool:
        """True when the run is on a CUDA device."""
        return torch.device(self.device).type == "cuda"

    def to_dict(self) -> dict:
        """Plain-dict form for the JSON report."""
        return dataclasses.asdict(self)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``bench`` flags to ``p``."""
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="problem size (default: tiny on CPU, medium on CUDA)")
    p.add_argument("-T", "--tokens", type=_positive_int, help="tokens routed to experts")
    p.add_argument("-H", "--hidden", type=_positive_int, help="hidden size")
    p.add_argument("-F", "--ffn", type=_positive_int, help="expert ffn hidden size")
    p.add_argument("-E", "--experts", type=_positive_int, help="number of experts")
    p.add_argument("-L", "--layers", type=_positive_int, help="number of expert layers")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    p.add_argument("--recipe", choices=RECIPE_CHOICES, default=None,
                   help="low-precision recipe of the quantized strategies (default fp8 where it "
                        "runs; 'none' drops them)")
    p.add_argument("--stack", choices=STACK_CHOICES, default=None,
                   help="fused = our GroupedMLP stack, unfused = the peers' torch._grouped_mm stack "
                        "(default: both on CUDA, fused on CPU)")
    p.add_argument("--model", choices=MODEL_CHOICES, default=None,
                   help="full = Qwen3-30B-A3B at full depth and vocabulary, LoRA + AdamW: each "
                        "strategy's longest sequence and tokens/s (the default on CUDA); slice (alias "
                        "qwen3) = the 8-layer Hugging Face Qwen3-MoE slice vs the peers and our "
                        "planner at --seq tokens (the default on the CPU, tiny there); mlp = stack "
                        "of expert MLPs; moe = stack of full MoE blocks (fused only); a "
                        "synthetic-stack flag selects mlp")
    p.add_argument("--seq", type=_positive_int, default=None,
                   help="tokens of the --model slice sequence (default 8192 on CUDA, 64 on CPU)")
    p.add_argument("--unit", type=_positive_int, default=None,
                   help="--model full: lengths are multiples of this (default 4096 on CUDA, 32 on CPU)")
    p.add_argument("--cap", type=_positive_int, default=None,
                   help="--model full: the longest length tried, a multiple of --unit; a strategy "
                        "reaching it is reported as '>= cap' (default 98304 on CUDA, raised to twice "
                        "HF checkpointing's longest when that is more; 256 on CPU)")
    p.add_argument("--time-budget", dest="time_budget", type=float, default=None,
                   help="--model full: seconds for the whole run; steps predicted to pass it are "
                        "skipped and reported (default 540 on CUDA, 600 on CPU)")
    p.add_argument("--device-memory-mib", dest="device_memory_mib", type=_positive_int, default=64,
                   help="--model full on the CPU: emulated device memory above the weights (MiB)")
    p.add_argument("--splits", choices=SPLIT_CHOICES, default="uniform",
                   help="tokens per expert: uniform or random (kept on the device)")
    p.add_argument("--top-k", type=_positive_int, default=2, help="top-k of --model moe")
    p.add_argument("--strategies", default=None,
                   help="comma list of strategy names or families (default: all that apply)")
    p.add_argument("--iters", type=_positive_int, default=None, help="timed steps per strategy")
    p.add_argument("--warmup", type=_non_negative_int, default=None, help="untimed steps first")
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH")
    p.add_argument("--plot", dest="plot_path", default=None, metavar="PATH.png")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", dest="progress", action="store_false")


def build_parser() -> argparse.ArgumentParser:
    """The full ``python -m moe_offload`` parser (subcommands ``bench`` and ``demo``)."""
    parser = argparse.ArgumentParser(
        prog="moe_offload",
        description="MoE activation-memory benchmark (default subcommand: bench).")
    sub = parser.add_subparsers(dest="command")
    bench = sub.add_parser("bench", help="step time vs activation memory of every strategy")
    add_bench_arguments(bench)
    demo = sub.add_parser("demo", help="train a small MoE transformer for a few steps")
    demo.add_argument("--steps", type=_positive_int, default=5)
    demo.add_argument("--device", default=None)
    demo.add_argument("--offload", action="store_true", help="offload the MoE blocks' activations")
    parser.subcommand_parsers = {"bench": bench, "demo": demo}
    return parser


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser,
                     known_strategies: Sequence[str] = ()) -> BenchConfig:
    """Resolve defaults and validate; bad values end in ``parser.error`` (exit code 2)."""
    device = args.device
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        parser.error(f"argument --device: invalid device {device!r}")
    if dev.type not in ("cpu", "cuda"):
        parser.error(f"argument --device: unsupported device {device!r} (cpu or cuda)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"argument --device: {device!r} requested but CUDA is not available")
    cuda = dev.type == "cuda"
    model = args.model
    if model is None:
        model = "mlp" if any(getattr(args, f, None) is not None for f in _SYNTHETIC_FLAGS) else (
            "full" if cuda else "qwen3")
    if model == "slice":
        model = "qwen3"
    if args.seq is not None and model != "qwen3":
        parser.error(f"argument --seq: only for --model slice, not --model {model}")
    for flag in ("unit", "cap", "time_budget"):
        if getattr(args, flag, None) is not None and model != "full":
            parser.error(f"argument --{flag.replace('_', '-')}: only for --model full, not --model {model}")
    unit = args.unit or (4096 if cuda else 32)
    cap = args.cap or (98304 if cuda else 256)
    if cap % unit or cap < unit:
        parser.error(f"argument --cap: {cap} must be a positive multiple of --unit {unit}")
    if args.time_budget is not None and args.time_budget <= 0:
        parser.error(f"argument --time-budget: expected seconds > 0, got {args.time_budget}")
    preset = PRESETS[args.preset or ("medium" if cuda else "tiny")]
    cfg = BenchConfig(
        tokens=args.tokens or preset.tokens, hidden=args.hidden or preset.hidden,
        ffn=args.ffn or preset.ffn, experts=args.experts or preset.experts,
        layers=args.layers or preset.layers, dtype=args.dtype or preset.dtype,
        device=device, preset=args.preset or ("medium" if cuda else "tiny"),
        recipe=args.recipe or "fp8", recipe_explicit=args.recipe is not None,
        stack=args.stack or ("both" if cuda else "fused"), model=model,
        splits=args.splits, top_k=args.top_k,
        iters=args.iters or (5 if cuda else 2),
        warmup=args.warmup if args.warmup is not None else (2 if cuda else 1),
        json_path=args.json_path, plot_path=args.plot_path, seed=args.seed,
        progress=args.progress, seq=args.seq or (8192 if cuda else 64), layers_explicit=args.layers,
        unit=unit, cap=cap, cap_explicit=args.cap is not None, time_budget=args.time_budget or (540.0 if cuda else 600.0),
        device_memory_mib=args.device_memory_mib)
    if cfg.tokens < cfg.experts:
        parser.error(f"--tokens {cfg.tokens} must be >= --experts {cfg.experts}")
    if cfg.model == "moe" and cfg.top_k > cfg.experts:
        parser.error(f"--top-k {cfg.top_k} must be <= --experts {cfg.experts}")
    if cfg.model == "moe" and cfg.stack != "fused":
        if args.stack not in (None, "fused"):
            parser.error(f"--model moe runs only on the fused stack, not --stack {args.stack}")
        cfg.stack = "fused"
    if cfg.plot_path is not None and not cfg.plot_path.lower().endswith(".png"):
        parser.error(f"argument --plot: expected a .png path, got {cfg.plot_path!r}")
    if args.strategies is not None:
        names = [s.strip() for s in args.strategies.split(",") if s.strip()]
        if not names:
            parser.error("argument --strategies: empty list")
        unknown = [n for n in names if n not in known_strategies]
        if unknown:
            parser.error(f"argument --strategies: unknown strategy {unknown[0]!r} "
                         f"(choose from {', '.join(known_strategies)})")
        cfg.strategies = names
    return cfg
