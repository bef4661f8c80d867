"""Train a Hugging Face Qwen3-MoE with ``Trainer``, with and without ``MoEOffloadCallback``.

    python examples/train_hf_trainer.py            # tiny model on the CPU (seconds)
    python examples/train_hf_trainer.py --slice    # GPU: the Qwen3-30B-A3B 8-layer slice

The model is built from a config (random weights, no download): on the CPU a tiny Qwen3-MoE,
with ``--slice`` the slice of the benchmark (``moe_offload.bench.workloads.QWEN3_SLICE``:
hidden 2048, 128 experts top-8, 8 decoder layers, bf16, SDPA) on ``--seq`` tokens per step.
The data are random token sequences (the loss only shows that training runs).

Rows, each a fresh model with the same weights and the same batches:

- ``hf``: HF's experts (``grouped_mm``), nothing else;
- ``hf+ckpt``: HF's experts with ``gradient_checkpointing=True`` (the usual way to save memory);
- ``callback``: ``MoEOffloadCallback()``: our experts, planned by ``fit`` for the whole device;
- ``callback@ckpt``: the same, with ``fit`` given the memory ``hf+ckpt`` peaked at (GPU only).

Per row: tokens/s over the steps after ``--warmup`` (the first step plans), and the peak
allocated device memory over those steps (parameters, gradients and AdamW state included).
"""
from __future__ import annotations

import argparse
import gc
import time

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from moe_offload.bench.workloads import QWEN3_SLICE, QWEN3_TINY, build_qwen3
from moe_offload.integrations.transformers import MoEOffloadCallback

GiB = float(1 << 30)


class Meter(TrainerCallback):
    """Wall time and peak device memory of the steps after ``warmup``."""

    def __init__(self, warmup: int, cuda: bool):
        self.warmup, self.cuda = warmup, cuda
        self.t0 = self.t1 = None
        self.timed = 0
        self.peak = None

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        if state.global_step == self.warmup:
            self.t0 = time.perf_counter()
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
        elif state.global_step > self.warmup:
            self.t1, self.timed = time.perf_counter(), state.global_step - self.warmup
            if self.cuda:
                self.peak = torch.cuda.max_memory_allocated()


def run(name: str, a, device: str, callback=None, ckpt: bool = False) -> dict:
    dims = QWEN3_SLICE if a.slice else QWEN3_TINY
    dtype = torch.bfloat16 if a.slice else torch.float32
    model, _ = build_qwen3(dims, a.seq, device, dtype, seed=0)
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": ids, "labels": ids}
            for ids in torch.randint(0, dims["vocab_size"], (a.steps, a.seq), generator=g)]
    meter = Meter(a.warmup, device == "cuda")
    args = TrainingArguments(f"/tmp/train_hf_trainer/{name}", max_steps=a.steps,
                             per_device_train_batch_size=1, learning_rate=1e-5, logging_steps=1,
                             save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
                             gradient_checkpointing=ckpt, use_cpu=device == "cpu",
                             log_level="warning")
    cbs = [meter] + ([callback] if callback is not None else [])
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=cbs)
    trainer.remove_callback(PrinterCallback)        # the table at the end says it all
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    row = dict(name=name, tokens_s=a.seq * meter.timed / (meter.t1 - meter.t0), peak=meter.peak,
               loss=logs[-1]["loss"], moved=logs[-1].get("moe_offload/offloaded_bytes"))
    del trainer, model, data
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--slice", action="store_true", help="the Qwen3-MoE 8-layer slice on the GPU")
    p.add_argument("--seq", type=int, default=None, help="tokens per step (default 8192 / 128)")
    p.add_argument("--steps", type=int, default=None, help="training steps per row (default 6 / 4)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (the first plans)")
    p.add_argument("--device-gib", type=float, default=None,
                   help="the device memory fit plans for (default: the GPU's; 4 GiB on the CPU)")
    a = p.parse_args()
    if a.slice and not torch.cuda.is_available():
        raise SystemExit("--slice needs a CUDA GPU")
    device = "cuda" if a.slice else "cpu"
    a.seq = a.seq or (8192 if a.slice else 128)
    a.steps = a.steps or (6 if a.slice else 4)
    if a.steps <= a.warmup:
        raise SystemExit("--steps must be larger than --warmup")
    dev_bytes = int(a.device_gib * GiB) if a.device_gib else (None if a.slice else 4 << 30)

    def callback(device_bytes, **kw):
        return MoEOffloadCallback(device_memory_bytes=device_bytes, log=print, **kw)

    rows = [run("hf", a, device), run("hf+ckpt", a, device, ckpt=True),
            run("callback", a, device, callback(dev_bytes, reserve_bytes=None if a.slice else 0))]
    if a.slice and rows[1]["peak"]:
        try:        # fit says so when nothing fits in what checkpointing used: print it, go on
            rows.append(run("callback@ckpt", a, device, callback(rows[1]["peak"], reserve_bytes=0)))
        except ValueError as e:
            print(f"callback@ckpt: {str(e).splitlines()[0]}")
    base = rows[0]
    print(f"\n{'row':<15} {'tokens/s':>10} {'x hf':>6} {'peak GiB':>9} {'x hf':>6} "
          f"{'offloaded MiB/step':>19} {'last loss':>10}")
    for r in rows:
        peak = f"{r['peak'] / GiB:9.2f} {r['peak'] / base['peak']:6.2f}" if r["peak"] else \
            f"{'n/a':>9} {'':>6}"
        moved = "" if r["moved"] is None else f"{r['moved'] / (1 << 20):.1f}"
        print(f"{r['name']:<15} {r['tokens_s']:10.0f} {r['tokens_s'] / base['tokens_s']:6.2f} "
              f"{peak} {moved:>19} {r['loss']:10.4f}")
    if device == "cuda":
        print(f"device: {torch.cuda.get_device_name()}, {a.seq} tokens/step, {a.steps - a.warmup} "
              "timed steps, bf16, AdamW")


if __name__ == "__main__":
    main()
